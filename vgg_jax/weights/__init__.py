"""Weights in other frameworks' layouts, in and out.

  torchvision_format.py  torchvision state dicts <-> our variables (plain and batch norm)
  caffe_format.py        the authors' Caffe nets (.caffemodel, V1 and newer layouts) <->
                         torchvision's key layout, with their BGR mean-pixel preprocessing
  caffe_schema.py        our protobuf descriptor of the part of Caffe's schema read and written
"""
