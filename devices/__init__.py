"""Device profiles (TOML) and benchmark runs on devices over ssh: push, install, run, pull."""
