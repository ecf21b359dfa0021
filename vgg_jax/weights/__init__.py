"""Weights in other frameworks' layouts, in and out.

  torchvision_format.py  torchvision state dicts <-> our variables (plain and batch norm)
"""
