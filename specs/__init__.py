"""muxtune.specs"""
