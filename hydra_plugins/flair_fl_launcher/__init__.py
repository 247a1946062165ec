"""flair-fl's Hydra launcher plugins (Hydra loads launchers only from `hydra_plugins`)."""
