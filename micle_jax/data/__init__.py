"""Input: augmentation, pretraining and supervised pipelines, tasks."""
