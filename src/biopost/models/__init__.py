"""Backbones, adapters and the one model class every stage trains and evaluates."""
