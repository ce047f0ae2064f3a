"""The gateway program: runtime, inner side, metrics, ownership mirror, policy reload,
config, main."""
