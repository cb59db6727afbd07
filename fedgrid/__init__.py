"""fedgrid: what the server, the sites, the admin tools and provisioning share."""

__version__ = "0.1.0"
