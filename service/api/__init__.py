"""Thin HTTP routes over the services in `service.services.Services`; no business logic here."""
