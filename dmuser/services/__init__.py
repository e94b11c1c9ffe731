"""dmuser/services"""
