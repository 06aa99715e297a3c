"""Hybrid sliding-window + linear attention: feature map, math, layer, decode cache."""
