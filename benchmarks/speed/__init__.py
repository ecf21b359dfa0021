"""The training-speed benchmark's parts (benchmarks/train_step.py is its command line).

settings  the settings every part takes explicitly (no flag is read below the CLI)
peaks     the dense peak TFLOP/s table and MFU
step      the real train step on synthetic device batches: rate, FLOPs, memory
loop      the whole training loop over the real input pipeline and its time split
max_batch the largest batch per device whose step compiles and runs
torch     torchvision's VGG of the same configuration, in a child process
photos    photo-like JPEG folders made from real photos (for loop mode and the GPU run)
report    the console lines of each part
compiles  what a process compiled (jax's monitoring events) and the cache hits
json_out  a part's JSON, rewritten the moment each figure exists
shared_memory  /dev/shm: what a process has mapped, what is free, the workers that fit
"""
