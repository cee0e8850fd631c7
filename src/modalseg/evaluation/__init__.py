"""modalseg.evaluation"""
