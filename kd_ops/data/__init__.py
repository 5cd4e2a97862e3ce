"""Data: the dataset registry and bundled datasets (`datasets`), corruptions a deployed model meets
(`corruptions`), the LightningDataModule that splits by seed (`datamodule`), input slices
(`slicing`) and replayed drift scenarios (`scenarios`)."""
