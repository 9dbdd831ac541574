"""Synthetic-data baselines (DatasetGAN / DatasetDDPM with DeepLabV3); filled by later issues."""
