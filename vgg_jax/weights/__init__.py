"""Weights in other frameworks' layouts, in and out, and the specs that name them.

  specs.py               one string names any weights (hub, files, runs): load -> variables
                         and the run config that describes them
  hub.py                 the Hugging Face hub (vgg16 = hf-hub:timm/vgg16.tv_in1k, ORG/NAME@REV)
  weight_files.py        .safetensors, .npz and .pth state dicts, read and written
  torchvision_format.py  torchvision state dicts <-> our variables (plain and batch norm)
  timm_format.py         timm's layout (fc6/fc7 as convolutions) <-> torchvision's
  net_config.py          the run config of foreign weights: the net and its preprocessing
  caffe_format.py        the authors' Caffe nets (.caffemodel, V1 and newer layouts) <->
                         torchvision's key layout, with their BGR mean-pixel preprocessing
  caffe_schema.py        our protobuf descriptor of the part of Caffe's schema read and written
"""
