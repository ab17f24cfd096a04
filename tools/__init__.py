"""muxtune.tools"""
