"""Training side: losses, SFT baselines, the in-process trainer, DeepSpeed ZeRO ranks and weight publishing."""
