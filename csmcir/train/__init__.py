"""Training with Lightning: datasets over a CIRSplit, a generic DataModule, the LightningModule
with its InfoNCE loss, the step schedule, the inference-folder export and the ``fit`` CLI."""
