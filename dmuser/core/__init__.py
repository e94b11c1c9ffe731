"""dmuser/core"""
