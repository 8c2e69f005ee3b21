"""Coordinator services: registry, routing, gateway (dispatch + relay), settlement, accounts."""
