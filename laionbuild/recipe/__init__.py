"""The recipe: its typed schema, Hydra composition from conf/, validation, params.yaml."""
