"""Placement: rules (YAML) that give each module of a model a device and an implementation."""
