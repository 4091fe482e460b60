"""What runs on the device: loading a model folder safely, generating, packaging, verifying bundles."""
