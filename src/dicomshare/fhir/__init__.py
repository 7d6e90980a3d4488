"""FHIR R4 views of the archive: ImagingStudy, Patient, Endpoint (see docs/fhir.md).

``ids`` makes the Patient ids, ``resources`` builds the JSON resources from QIDO-style
search results; the HTTP routes are in web/fhir_api.py.
"""
