"""Device profiles and remote benchmark runs over ssh (a later issue)."""
