"""The gateway program: runtime, inner side, metrics, ownership mirror, resume (sessions
that outlive the process), policy reload, config, main."""
