"""modalseg.losses"""
