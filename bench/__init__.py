"""Side-by-side DICOMweb benchmark harness for dicomshare and Orthanc (see README.md)."""
