"""`phiedge build`: plan, Olive, fixes, and the stages that make a checked model folder."""
