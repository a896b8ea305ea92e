"""Declaring a recipe: step and handler decorators, config, control exceptions, the recipe file.

The bottom layer: it imports nothing from the other layers, so a recipe's declarations run no engine.
"""
