"""The HTTP API: A1111's ``/sdapi/v1/*`` routes."""
