"""The MLflow side: where runs go and how models are logged (`tracking`), promotion gates (`gates`),
the champion alias with promotion and rollback (`promotion`), lineage tags (`lineage`) and the
model card (`model_card`)."""
