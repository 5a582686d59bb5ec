"""The calibration state on disk: its fields, their validation and the safetensors file."""
