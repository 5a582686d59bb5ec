"""What a scheme is: number formats, per-stream arguments, the config, presets and module patterns."""
