"""What is made from an output folder: label exports (labels), a static page (gallery), and where a
run stands (status)."""
