"""Every controller the control loop can drive (PD, torch, ONNX, classical), and the factory."""
