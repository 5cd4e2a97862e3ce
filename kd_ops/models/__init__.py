"""Models: the network zoo (`zoo`), teacher ensembles (`ensemble`), loading users' models from MLflow
pickle-free (`loading`), and scikit-learn students fitted on soft targets (`sklearn_students`)."""
