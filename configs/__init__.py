"""Shipped LightningCLI configs, installed as the package `multibyte.shipped_configs` so a bare
config name (`--config image64.yaml`) resolves from any folder. The YAML files are the content."""
