"""The MLflow side: where runs go and how models are logged (`tracking`), the data each run saw as
MLflow dataset inputs (`datasets`), promotion gates (`gates`), the champion alias with promotion
and rollback (`promotion`), lineage tags (`lineage`) and the model card (`model_card`)."""
