"""Pure builders: API model in, Kubernetes manifest dict out. No API calls here."""
