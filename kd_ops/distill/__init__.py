"""Distillation: the LightningModule (`module`), the loss terms (`losses/`, one file each), the training
strategies (`strategies/`, one file each), feature taps by module path (`taps`), the teacher-output
cache (`cache`) and its distributed computation (`distributed`)."""
