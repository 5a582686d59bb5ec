"""The calibrated quantizer and the DynamicCache subclass that holds one conversation with it."""
