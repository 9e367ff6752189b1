"""The learning core (torch): PEARL, MAML dynamics, training, checkpoints, export, retraining."""
