import os
import sys

# rcca_core is imported as a top-level package here, with no ComfyUI on the path
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
