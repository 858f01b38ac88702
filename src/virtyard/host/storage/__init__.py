"""Host storage: SCSI identification and iSCSI access to SAN LUNs without a kernel initiator."""
