"""Ray Serve deployments of longlive: thin shells over `longlive_core` (see app.build_app)."""
