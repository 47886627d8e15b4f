"""Thin HTTP routes over the services in `service.app.Services`; no business logic here."""
