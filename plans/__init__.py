"""muxtune.plans"""
