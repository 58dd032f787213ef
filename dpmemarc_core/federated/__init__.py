"""What a site and the server do in a federated run, transport-free (no Flower import)."""
