"""The 4D generator: temporal-structure initialisation, reconstruction network, per-scene 4D optimisation."""
