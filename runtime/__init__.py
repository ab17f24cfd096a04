"""muxtune.runtime"""
