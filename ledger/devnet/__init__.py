"""Single-node dev validator speaking Sawtooth 1.2 protocols."""
