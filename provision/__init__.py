"""The provisioning tool: project schema, root CA and certificates, kit builders, and `provision` itself."""
