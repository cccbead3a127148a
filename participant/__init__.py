"""The participant worker: local data, local training, publishing updates."""
